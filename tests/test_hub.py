"""MODEL_DIR as a hub id, offline, against a hub cache laid out as huggingface_hub lays it out."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import run_cli, tree_hash
from wanda_stream.cli import main

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(cache: Path, repo: str, model: Path) -> Path:
    """models--ORG--NAME/ with refs/main naming a commit, and snapshots/COMMIT/ files that are relative
    symlinks into blobs/, as huggingface_hub writes them; returns the snapshot directory."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    snap, blobs = repo_dir / "snapshots" / COMMIT, repo_dir / "blobs"
    for d in (repo_dir / "refs", snap, blobs):
        d.mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    for f in sorted(model.iterdir()):
        data = f.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (blobs / blob).write_bytes(data)
        (snap / f.name).symlink_to(Path("..", "..", "blobs", blob))
    return snap


@pytest.fixture()
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty hub cache, offline, for in-process calls (huggingface_hub read the environment at import)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_prune_from_a_cached_id_with_the_environment_offline(tiny_model: Path, tmp_path: Path) -> None:
    home = tmp_path / "hf"
    hub_cache(home / "hub", "acme/tiny", tiny_model)
    out, ref = tmp_path / "out", tmp_path / "ref"
    env = {"HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_HUB_OFFLINE": "1", "HF_TOKEN": ""}
    r = run_cli("prune", "acme/tiny", str(out), "--method", "magnitude", "--quiet", env=env)
    assert r.returncode == 0, r.stderr
    assert main(["prune", str(tiny_model), str(ref), "--method", "magnitude", "--quiet"]) == 0
    skip = ("wanda_stream.json", "README.md")
    assert {k: v for k, v in tree_hash(out).items() if k not in skip} == \
        {k: v for k, v in tree_hash(ref).items() if k not in skip}
    assert (out / "README.md").read_text().startswith('---\nbase_model: "acme/tiny"\n')
    report = json.loads((out / "wanda_stream.json").read_text())
    assert report["config"]["model_dir"].endswith(f"models--acme--tiny/snapshots/{COMMIT}")


def test_eval_and_inspect_from_an_id_and_the_refusals(tiny_model: Path, tmp_path: Path, offline_cache: Path,
                                                      capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    hub_cache(offline_cache, "acme/tiny", tiny_model)
    ev = ["--data", "pydoc", "--seqlen", "48", "--max-windows", "2", "--device", "cpu", "--json", "--quiet"]
    capsys.readouterr()
    assert main(["eval", "acme/tiny", *ev]) == 0
    from_id = json.loads(capsys.readouterr().out)
    assert main(["eval", str(tiny_model), *ev]) == 0
    assert from_id["perplexity"] == json.loads(capsys.readouterr().out)["perplexity"]
    assert main(["inspect", "acme/tiny", "--revision", "main", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["matrices"]) == 21

    def refused(argv: list[str]) -> str:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        return err

    err = refused(["inspect", "acme/absent"])
    assert "acme/absent: no local directory of that name, and not in the hub cache" in err and "HF_HUB_OFFLINE" in err
    assert "not in the hub cache" in refused(["prune", "acme/absent", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
    pickles = tmp_path / "pickles"
    pickles.mkdir()
    (pickles / "config.json").write_text("{}")
    (pickles / "pytorch_model.bin").write_bytes(b"pickle")
    hub_cache(offline_cache, "acme/pickled", pickles)
    assert "holds only pickle weights" in refused(["inspect", "acme/pickled"])
    # A local directory wins over a hub id of the same name.
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model, tmp_path / "acme" / "absent")
    assert main(["inspect", "acme/absent", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model_dir"] == str(tmp_path / "acme" / "absent")
    assert "--revision v1: only for a hub model id" in refused(["inspect", "acme/absent", "--revision", "v1"])


def test_the_hub_patterns_fetch_what_serving_the_output_needs() -> None:
    """A multimodal checkpoint's processor configs are fetched (the run copies them to the output, which
    is served with them); the original consolidated weights and other formats are not."""
    from fnmatch import fnmatch

    from wanda_stream.storage.hub import ALLOW_PATTERNS

    def fetched(name: str) -> bool:
        return any(fnmatch(name, p) for p in ALLOW_PATTERNS)

    wanted = ["config.json", "generation_config.json", "model-00001-of-00050.safetensors", "model.safetensors.index.json",
              "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
              "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json", "README.md"]
    assert [n for n in wanted if not fetched(n)] == []
    assert [n for n in ["original/consolidated.00.pth", "pytorch_model.bin", "model.gguf", "LICENSE"] if fetched(n)] == []

