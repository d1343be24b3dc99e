"""Request checks shared by every servicer: unknown fields, UTF-8, ranges and sizes."""

from __future__ import annotations

from google.protobuf import empty_pb2, unknown_fields
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from services.shared.errors import InvalidArgument


def find_unknown_field(message: Message, path: str = "") -> str | None:
    """The dotted path of the first unknown field in `message` (recursively), or None.

    Clients built from a newer or foreign contract may send fields this server does not know;
    protobuf would drop them silently, so the server says so instead.
    """
    for unknown in unknown_fields.UnknownFieldSet(message):
        return f"{path}#{unknown.field_number}" if path else f"#{unknown.field_number}"
    for field, value in message.ListFields():
        if field.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        child_path = f"{path}.{field.name}" if path else field.name
        children = value if field.is_repeated else [value]
        for child in children:
            found = find_unknown_field(child, child_path)
            if found:
                return found
    return None


def explain_decode_error(message_class: type[Message], data: bytes) -> str:
    """Name the top-level string field whose bytes are not UTF-8, for a readable error.

    Parsing `data` as Empty keeps every field as raw unknown bytes, so the offending field can be
    found without protobuf's own (field-less) UTF-8 error.
    """
    try:
        raw_fields = unknown_fields.UnknownFieldSet(empty_pb2.Empty.FromString(data))
    except DecodeError:
        return "request is not a valid protobuf message"
    by_number = message_class.DESCRIPTOR.fields_by_number
    for raw in raw_fields:
        field = by_number.get(raw.field_number)
        if field is None or not isinstance(raw.data, bytes):
            continue
        if field.type == FieldDescriptor.TYPE_STRING:
            try:
                raw.data.decode("utf-8")
            except UnicodeDecodeError:
                return f"{field.name}: not valid UTF-8"
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            try:
                field.message_type._concrete_class.FromString(raw.data)
            except DecodeError:
                inner = explain_decode_error(field.message_type._concrete_class, raw.data)
                return f"{field.name}.{inner}"
    return "request could not be parsed (malformed protobuf or invalid UTF-8)"


def check_text(field: str, value: str, *, max_bytes: int, may_be_empty: bool = False) -> None:
    """Raise InvalidArgument unless `value` is non-empty (if required) and at most max_bytes UTF-8."""
    if not value and not may_be_empty:
        raise InvalidArgument(field, "must not be empty")
    num_bytes = len(value.encode("utf-8"))
    if num_bytes > max_bytes:
        raise InvalidArgument(field, f"is {num_bytes} bytes, the limit is {max_bytes}")


def check_range(field: str, value: float, *, low: float, high: float) -> None:
    """Raise InvalidArgument unless low <= value <= high."""
    if not low <= value <= high:
        raise InvalidArgument(field, f"must be in [{low}, {high}], got {value}")
