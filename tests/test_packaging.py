"""`pip install .` ships everything the package imports: a wheel built offline from the sources,
installed into a bare folder, imports every wikigpt module and loads the corpus_perplexity metric
from there, not from the checkout."""

import json
import math
import os
import shutil
import subprocess
import sys
import zipfile

from conftest import REPO

IMPORT_ALL = """
import importlib, json, sys
import wikigpt
for name in sys.argv[1:]:
    importlib.import_module(name)
from wikigpt.evaluation.perplexity import load_corpus_perplexity
metric = load_corpus_perplexity()
metric.add_batch(nll_sum=[6.0], token_count=[3], word_count=[0], byte_count=[0])
print(json.dumps({"package": wikigpt.__file__, "perplexity": metric.compute()["perplexity"]}))
"""


def test_wheel_installs_every_module_the_package_imports(tmp_path):
    # Build from a copy, so no build/ or egg-info lands in the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "wikigpt", src / "wikigpt", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [
            *pip,
            "wheel",
            str(src),
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
        ],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = (tmp_path / "dist").glob("wikigpt-*.whl")
    sources = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "wikigpt").rglob("*.py"))
    missing = set(sources) - set(zipfile.ZipFile(wheel).namelist())
    assert not missing, f"the wheel leaves out {sorted(missing)}"

    site = tmp_path / "site"
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], check=True
    )
    modules = [p[:-3].replace("/", ".") for p in sources if "corpus_perplexity" not in p]
    env = {
        **os.environ,
        "PYTHONPATH": str(site),
    }  # the installed copy only: the checkout is not on the path
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL, *modules],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["package"] == str(site / "wikigpt" / "__init__.py")
    assert (
        len(modules) > 40 and "wikigpt.train.run" in modules
    )  # every subpackage's modules were imported
    assert math.isclose(report["perplexity"], math.exp(2.0), rel_tol=1e-9)
