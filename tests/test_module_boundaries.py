"""No service imports another service's modules: code two services need lives in `services/core/`
(model code) or `services/shared/` (infrastructure). Read from the source with `ast`, so an import
inside a function counts as much as one at the top."""

from __future__ import annotations

import ast
from pathlib import Path

SERVICES_DIR = Path(__file__).resolve().parents[1] / "services"
OWNED_BY_NO_SERVICE = {"shared", "core"}


def imported_modules(source: str, module: str, is_package: bool) -> set[str]:
    """Absolute names of every module `source` imports (relative imports resolved against `module`)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".")
                base = parts if is_package else parts[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base)
                target = f"{prefix}.{node.module}" if node.module else prefix
            else:
                target = node.module or ""
            names.add(target)
            # `from services import predictor` names a package through its alias.
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return names


def owning_package(module: str) -> str | None:
    """`predictor` for `services.predictor.x`, None for anything outside `services`."""
    parts = module.split(".")
    if parts[0] != "services" or len(parts) < 2:
        return None
    return parts[1]


def boundary_violations(services_dir: Path = SERVICES_DIR) -> list[str]:
    violations = []
    for path in sorted(services_dir.rglob("*.py")):
        relative = path.relative_to(services_dir.parent).with_suffix("")
        owner = relative.parts[1] if len(relative.parts) > 2 else None
        if owner is None or owner in OWNED_BY_NO_SERVICE:
            continue
        is_package = relative.name == "__init__"
        module = ".".join(relative.parts[:-1] if is_package else relative.parts)
        for name in imported_modules(path.read_text(), module, is_package):
            other = owning_package(name)
            if other is None or other == owner or other in OWNED_BY_NO_SERVICE:
                continue
            if (services_dir / other).is_dir():
                violations.append(f"{path.relative_to(services_dir.parent)} imports {name}")
    return violations


def test_no_service_imports_another_service() -> None:
    assert boundary_violations() == []


def test_shared_and_core_import_no_service() -> None:
    # The packages every service may import must not reach back into a service themselves.
    offenders = []
    for owner in OWNED_BY_NO_SERVICE:
        for path in sorted((SERVICES_DIR / owner).rglob("*.py")):
            relative = path.relative_to(SERVICES_DIR.parent).with_suffix("")
            is_package = relative.name == "__init__"
            module = ".".join(relative.parts[:-1] if is_package else relative.parts)
            for name in imported_modules(path.read_text(), module, is_package):
                other = owning_package(name)
                if other is not None and other not in OWNED_BY_NO_SERVICE and (SERVICES_DIR / other).is_dir():
                    offenders.append(f"{path.relative_to(SERVICES_DIR.parent)} imports {name}")
    assert offenders == []


def test_the_check_sees_a_crossing(tmp_path: Path) -> None:
    # The check must be able to fail: a top-level, a function-level and a relative crossing.
    services = tmp_path / "services"
    for package in ("shared", "core", "alpha", "beta"):
        (services / package).mkdir(parents=True)
        (services / package / "__init__.py").write_text("")
    (services / "alpha" / "ok.py").write_text(
        "from services.shared import x\nfrom services.core.y import z\nfrom services.alpha import w\n"
    )
    (services / "alpha" / "top.py").write_text("from services.beta.model import M\n")
    (services / "alpha" / "late.py").write_text("def f():\n    import services.beta.model\n")
    (services / "alpha" / "rel.py").write_text("from ..beta import model\n")
    (services / "alpha" / "pkg.py").write_text("from services import beta\n")
    found = boundary_violations(services)
    assert sorted({v.split()[0] for v in found}) == [
        "services/alpha/late.py",
        "services/alpha/pkg.py",
        "services/alpha/rel.py",
        "services/alpha/top.py",
    ]
