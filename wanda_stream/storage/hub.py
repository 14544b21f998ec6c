"""MODEL_DIR as a Hugging Face hub id: resolved to a local snapshot, with only the files a run reads.

One function for every command: a local directory wins; an ORG/NAME that is not one is looked up in
the hub cache (HF_HOME / HF_HUB_CACHE), or downloaded unless HF_HUB_OFFLINE is set (HF_TOKEN is read
by huggingface_hub itself). Repositories with pickle weights only are refused before any download.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from wanda_stream.errors import InputError

# What a run reads or copies: weights, config, generation config, tokenizer, chat template, the card.
ALLOW_PATTERNS = [
    "*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json", "tokenizer*",
    "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.tiktoken", "chat_template*",
    "*processor_config.json", "README.md",  # a multimodal model's image (and video) processors: copied to the output
]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(text: str) -> bool:
    """Whether `text` is spelled as a hub model id, ORG/NAME."""
    return bool(_HUB_ID.fullmatch(text))


@dataclass(frozen=True)
class ResolvedModel:
    """A model's local directory, and the hub id it came from (None for a local directory)."""

    path: Path
    hub_id: str | None = None


def resolve_model(spec: Path, revision: str | None = None) -> ResolvedModel:
    """MODEL_DIR as given on the command line -> a local checkpoint directory.

    Raises InputError (one line) for a gated, missing or not-cached-while-offline id, and for a
    repository that holds only pickle weights.
    """
    text = str(spec)
    if spec.exists() or not is_hub_id(text):
        if revision is not None:
            raise InputError(f"--revision {revision}: only for a hub model id (ORG/NAME); {text} is a local path")
        return ResolvedModel(spec.resolve())
    from huggingface_hub import constants

    where = f"{text}{'@' + revision if revision else ''}"
    if constants.HF_HUB_OFFLINE:
        path = _cached(text, revision, where)
    else:
        _check_safetensors(_remote_files(text, revision, where), where)
        path = _download(text, revision, where)
    _check_safetensors([p.name for p in path.iterdir()], where)
    return ResolvedModel(path, text)


def _cached(repo: str, revision: str | None, where: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=ALLOW_PATTERNS, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        raise InputError(
            f"{where}: no local directory of that name, and not in the hub cache ({_cache_dir()}) while "
            "HF_HUB_OFFLINE is set; download it first (unset HF_HUB_OFFLINE) or pass a local directory"
        ) from None


def _cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _remote_files(repo: str, revision: str | None, where: str) -> list[str]:
    from huggingface_hub import HfApi

    try:
        return HfApi().list_repo_files(repo, revision=revision)
    except Exception as e:  # noqa: BLE001 - gated, missing, no network: one line for the user
        raise _hub_error(where, e) from None


def _download(repo: str, revision: str | None, where: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except Exception as e:  # noqa: BLE001 - as above
        raise _hub_error(where, e) from None


def _hub_error(where: str, e: Exception) -> InputError:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(e, GatedRepoError):
        why = "a gated model: accept its terms on huggingface.co and set HF_TOKEN"
    elif isinstance(e, RevisionNotFoundError):
        why = "no such revision; check --revision"
    elif isinstance(e, RepositoryNotFoundError):
        why = "no such model on the hub (or a private one: set HF_TOKEN), and no local directory of that name"
    else:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        why = f"cannot reach the hub ({first}); check the network, or set HF_HUB_OFFLINE=1 to use the cache"
    return InputError(f"{where}: {why}")


def _check_safetensors(names: list[str], where: str) -> None:
    if any(n.endswith(".safetensors") for n in names):
        return
    if any(n.endswith(PICKLE_SUFFIXES) for n in names):
        raise InputError(f"{where}: holds only pickle weights (.bin/.pt), which wanda-stream does not load; "
                         "use a repository with .safetensors weights or convert it")
    raise InputError(f"{where}: has no .safetensors weights")
