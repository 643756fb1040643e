"""The package layout: the namespace mapping, and no shadowing of the standard library."""

from __future__ import annotations

import subprocess
import sys
import tomllib

from helpers import REPO


def test_platform_folder_does_not_shadow_stdlib():
    code = "import platform, torch; platform.system(); print(platform.__file__)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert not result.stdout.strip().startswith(str(REPO)), result.stdout


def test_area_folders_are_timfusion_subpackages():
    import timfusion.meta
    import timfusion.platform.cli
    import timfusion.search_spaces
    import timfusion.tasks

    for module, folder in [
        (timfusion.platform.cli, "platform"), (timfusion.tasks, "tasks"),
        (timfusion.meta, "meta"), (timfusion.search_spaces, "search_spaces"),
    ]:
        assert (REPO / folder) in __import__("pathlib").Path(module.__file__).resolve().parents


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"timfusion"}
    for area in ("platform", "tasks", "search_spaces", "meta"):
        root = REPO / area
        found.add(f"timfusion.{area}")
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(REPO).parts
            found.add("timfusion." + ".".join(rel))
    assert found <= listed, f"add to pyproject [tool.setuptools] packages: {sorted(found - listed)}"


def test_ci_runs_make_test_and_readme_starts_with_the_two_commands():
    assert "make test" in (REPO / ".ci" / "run").read_text()
    head = "\n".join((REPO / "README.md").read_text().splitlines()[:40])
    assert "make run" in head and "make test" in head
