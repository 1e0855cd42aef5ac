"""The mirror as a user installs it: a wheel, in a fresh virtual environment, migrating a fresh
database. An editable install finds schema.sql in the source tree whatever the packaging says;
only a real wheel shows that the schema and the explorer's page ship inside the package."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import fresh_database

ROOT = Path(__file__).resolve().parents[2]
# Everything but what a clean clone would not have.
_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", ".data", "build", "*.egg-info", "__pycache__",
                                     ".*_cache", ".hypothesis", "test-artifacts")


@pytest.fixture
def empty_database(server_url: str) -> Iterator[str]:
    """A database with nothing in it (not cloned from the migrated template)."""
    with fresh_database(server_url, None) as url:
        yield url


def _run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None,
         timeout: float = 180) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, f"{args}: {result.stdout}\n{result.stderr}"
    return result


@pytest.mark.timeout(300)
async def test_a_wheel_installed_in_a_fresh_venv_migrates_a_fresh_database(
        tmp_path: Path, empty_database: str) -> None:
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=_NOT_SOURCE)
    _run(sys.executable, "-m", "pip", "wheel", source, "--no-deps", "-q", "-w", tmp_path / "dist",
         cwd=tmp_path)
    [wheel] = (tmp_path / "dist").glob("trackstar_mirror-*.whl")

    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel,
         cwd=tmp_path)
    # The dependencies come from the environment running the tests (no network needed); a
    # path line in a .pth file adds that directory only, not the editable install of the
    # source tree that its own .pth files would add.
    fresh_site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                           cwd=tmp_path).stdout.strip())
    (fresh_site / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path),
           "DATABASE_URL": empty_database}
    where = _run(python, "-c", "import mirror; print(mirror.__file__)", cwd=tmp_path, env=env)
    assert where.stdout.startswith(str(venv)), where.stdout  # the wheel's copy, not the source

    migrated = _run(venv / "bin" / "mirror", "migrate", cwd=tmp_path, env=env)
    assert "schema applied" in migrated.stdout

    conn = await asyncpg.connect(empty_database)
    try:
        assert await conn.fetchval("SELECT to_regclass('mirror.events') IS NOT NULL")
        assert await conn.fetchval("SELECT count(*) FROM mirror.resources") > 0
        assert await conn.fetchval(
            "SELECT mirror.object_as_of('order', 'nope', now())") is None
    finally:
        await conn.close()
    served = _run(python, "-c", "from mirror.ui import load_assets; print(sorted(load_assets()))",
                  cwd=tmp_path, env=env)
    assert "index.html" in served.stdout


def test_the_top_level_schema_is_the_packaged_one() -> None:
    """Readers find the canonical schema at the top of the repository; it is the file the
    package ships."""
    assert (ROOT / "schema.sql").read_text() == (ROOT / "mirror" / "schema.sql").read_text()
