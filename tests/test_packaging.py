"""The console scripts work from a built wheel (configs shipped inside the package), not only in place."""

import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    """A venv that sees the installed dependencies but gets nmt only from a freshly built wheel."""
    work = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(work / "dist"), str(ROOT)], check=True)
    wheel = next((work / "dist").glob("nmt-*.whl"))
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # the dependencies from this environment's site-packages, but as plain paths: the .pth files there (this
    # checkout's editable install among them) are not processed, so nmt comes from the wheel alone. (Not
    # --system-site-packages: run from a venv, that gives the base interpreter's packages, not this venv's.)
    (target,) = Path(venv / "lib").glob("python*/site-packages")
    (target / "parent_environment.pth").write_text("".join(f"{path}\n" for path in site.getsitepackages()))
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall",
                    str(wheel)], check=True)
    return venv / "bin", work


def test_wheel_ships_configs_and_scripts(wheel_env):
    bin_dir, work = wheel_env
    # run from a directory without the source tree, so nothing is picked up from the checkout
    out = subprocess.run([str(bin_dir / "nmt-train"), "experiment=debug", "--cfg"], cwd=work,
                         capture_output=True, text=True, check=True)
    assert "name: debug" in out.stdout and "hidden_size: 96" in out.stdout
    where = subprocess.run([str(bin_dir / "python"), "-c", "import nmt, sys; print(nmt.__file__)"], cwd=work,
                           capture_output=True, text=True, check=True).stdout
    assert str(ROOT) not in where
    for script in ("nmt-evaluate", "nmt-translate", "nmt-embeddings"):
        out = subprocess.run([str(bin_dir / script)], cwd=work, capture_output=True, text=True)
        assert out.returncode == 2 and "Missing required setting(s): run" in out.stderr


def test_wheel_rejects_bad_override_cleanly(wheel_env):
    bin_dir, work = wheel_env
    out = subprocess.run([str(bin_dir / "nmt-train"), "model.hiden_size=5"], cwd=work, capture_output=True, text=True)
    assert out.returncode == 2
    assert "model.hiden_size" in out.stderr and "Traceback" not in out.stderr
