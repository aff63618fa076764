"""Upload a finished run to the Hugging Face Hub, or see what would be uploaded, offline, first.

    python -m training.hub outputs/pretrain/nano_cpu --repo_id=me/ember-nano --dry_run     # lists, no network
    python -m training.hub outputs/pretrain/nano_cpu --repo_id=me/ember-nano               # uploads

The files are chosen exactly as `huggingface_hub.upload_folder` chooses them (its default ignore patterns plus
Ember's: resumable checkpoints stay local), so the dry run lists what the upload sends. The pretraining recipe's
`--push_to_hub=true` goes through `push` too, and keeps Ember's model card (the Trainer's own push would replace
it with its generic one).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import upload_folder
from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS
from huggingface_hub.utils import filter_repo_objects

from cli import ConfigError, parse_args, report_error

# Checkpoints are for resuming, not for users of the model.
IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", "stream_state_*.json", "run.lock"]


@dataclass
class PushArguments:
    folder: str = field(metadata={"help": "the run's output folder (first positional argument)"})
    repo_id: str = field(metadata={"help": "the Hub repository, e.g. your-name/ember-nano"})
    revision: str = field(default="main", metadata={"help": "the branch to commit to"})
    commit_message: str = "Ember: trained model"
    dry_run: bool = field(default=False, metadata={"help": "list the files and the target; no network"})


def files_to_upload(folder: str | Path) -> list[tuple[str, int]]:
    """(path in the repository, bytes) of every file an upload of `folder` sends, sorted."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"{root}: no such folder")
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    kept = filter_repo_objects(paths, ignore_patterns=[*IGNORE_PATTERNS, *DEFAULT_IGNORE_PATTERNS])
    return [(path, (root / path).stat().st_size) for path in kept]


def describe_upload(folder: str | Path, repo_id: str, revision: str = "main") -> str:
    """What an upload would do, as text: the target and every file with its size."""
    files = files_to_upload(folder)
    lines = [f"would upload {len(files)} files ({sum(size for _, size in files) / 2**20:,.1f} MiB) from {folder} "
             f"to https://huggingface.co/{repo_id} (revision {revision}):"]
    lines += [f"  {size:>14,}  {path}" for path, size in files]
    return "\n".join(lines)


def push(folder: str | Path, repo_id: str, revision: str = "main", commit_message: str = "Ember: trained model"):
    """Upload the files `files_to_upload` lists to `repo_id` at `revision`; returns the commit info."""
    return upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision, commit_message=commit_message,
                         ignore_patterns=IGNORE_PATTERNS)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        (args,) = parse_args((PushArguments,), sys.argv[1:] if argv is None else argv, prog="python -m training.hub",
                             description=__doc__.split("\n\n")[0], positionals=("folder",), path_keys=("folder",))
        if args.dry_run:
            print(describe_upload(args.folder, args.repo_id, args.revision))
            return 0
        files_to_upload(args.folder)  # a missing folder fails here, before any network
        info = push(args.folder, args.repo_id, args.revision, args.commit_message)
    except (ConfigError, ValueError, OSError) as err:
        return report_error(err)
    print(f"uploaded to {getattr(info, 'commit_url', args.repo_id)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
