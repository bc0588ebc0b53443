"""constraints.txt, the pinned versions ``python3 dev.py`` installs: every requirement of
pyproject.toml (dependencies and every extra; torch is pinned in dev.py) has exactly one
``==`` pin inside pyproject's range, and a changed pin changes dev.py's install stamp, so an
existing .venv is reinstalled."""

import importlib.util
import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11, as dev.py
requirements = pytest.importorskip("packaging.requirements")

ROOT = Path(__file__).resolve().parents[1]


def _canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(text):
    """``{name: version}`` of the ``name==version`` lines; anything else is refused."""
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][A-Za-z0-9.+!-]*)", line)
        assert match, f"constraints.txt: expected 'name==version', got {line!r}"
        name = _canonical(match[1])
        assert name not in pins, f"constraints.txt pins {name} twice"
        pins[name] = match[2]
    return pins


def _dev_module():
    spec = importlib.util.spec_from_file_location("dev", ROOT / "dev.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_requirement_is_pinned_inside_its_range():
    pins = _pins((ROOT / "constraints.txt").read_text())
    assert "torch" not in pins  # pinned in dev.py alone
    pins["torch"] = _dev_module().TORCH_PIN.split("==")[1]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    listed = project["dependencies"] + [r for extra in project["optional-dependencies"].values()
                                        for r in extra]
    for line in listed:
        req = requirements.Requirement(line)
        name = _canonical(req.name)
        assert name in pins, f"{req.name} (pyproject.toml) has no pin in constraints.txt"
        assert req.specifier.contains(pins[name]), (
            f"the pin {name}=={pins[name]} is outside pyproject's range {req.specifier}")


def test_a_changed_pin_changes_the_install_stamp(tmp_path, monkeypatch):
    dev = _dev_module()
    constraints = tmp_path / "constraints.txt"
    constraints.write_text((ROOT / "constraints.txt").read_text())
    monkeypatch.setattr(dev, "CONSTRAINTS", constraints)
    before = dev.install_stamp("dev")
    assert dev.install_stamp("dev") == before
    constraints.write_text(constraints.read_text().replace("numpy==", "numpy==0"))
    assert dev.install_stamp("dev") != before


def test_every_pip_install_of_dev_py_takes_the_constraints(tmp_path, monkeypatch):
    dev = _dev_module()
    calls = []
    monkeypatch.setattr(dev, "VENV", tmp_path)
    monkeypatch.setattr(dev, "BIN", tmp_path)
    monkeypatch.setattr(dev.venv, "create", lambda *a, **k: calls.append(("venv",)))
    monkeypatch.setattr(dev, "run", lambda *cmd: calls.append(cmd))
    dev.ensure_env("dev")
    installs = [c for c in calls if "pip" in c]
    assert [c[-1] for c in installs] == ["pip", ".[dev]"]
    for call in installs:
        i = call.index("install")
        assert call[i + 1:i + 4] == ("--quiet", "-c", dev.CONSTRAINTS), call
    assert dev.install_stamp("dev").exists()
    calls.clear()
    dev.ensure_env("dev")  # installed: nothing runs
    assert calls == []
