"""Magnus log database: models, engine, migrations, buffered log writer and read helpers."""

from services.shared.db.engine import (
    default_database_url,
    make_engine,
    make_session_factory,
)
from services.shared.db.log_writer import LogWriter
from services.shared.db.migrate import current, downgrade, head_revision, upgrade
from services.shared.db.models import (
    BATCH_OUTCOMES,
    MODEL_KINDS,
    REQUEST_STATUSES,
    SAMPLE_SOURCES,
    Base,
    BatchRow,
    BatchTimeSample,
    ModelVersion,
    RequestRow,
    TrainerState,
    utc_now,
)
from services.shared.db.queries import (
    add_model_version,
    fetch_batch_time_samples,
    fetch_batches,
    find_completed_request,
    fetch_requests,
    get_state,
    latest_model_version,
    set_state,
)

__all__ = [
    "BATCH_OUTCOMES",
    "MODEL_KINDS",
    "REQUEST_STATUSES",
    "SAMPLE_SOURCES",
    "Base",
    "BatchRow",
    "BatchTimeSample",
    "LogWriter",
    "ModelVersion",
    "RequestRow",
    "TrainerState",
    "add_model_version",
    "current",
    "default_database_url",
    "downgrade",
    "fetch_batch_time_samples",
    "fetch_batches",
    "fetch_requests",
    "find_completed_request",
    "get_state",
    "head_revision",
    "latest_model_version",
    "make_engine",
    "make_session_factory",
    "set_state",
    "upgrade",
    "utc_now",
]
