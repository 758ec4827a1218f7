"""DVC stage `download`: fetch the Zenodo archives (resumable, checksummed) and extract them, or
check a folder dataset in nnU-Net's raw layout and link it in (`dataset.source: folder`)."""

import argparse
from pathlib import Path

from covidseg.config import load_params
from covidseg.data.download import fetch_archives
from covidseg.data.folder import ingest_folder
from covidseg.stage import run_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", type=Path, required=True, help="folder keeping the archives")
    parser.add_argument("--out", type=Path, required=True, help="extracted archives (data/raw)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    params = load_params(args.params)
    if params.dataset.source == "folder":
        ingest_folder(params.dataset, args.out, workers=params.runtime.prepare_workers)
    else:
        fetch_archives(params.download, cache_dir=args.cache, raw_dir=args.out)


if __name__ == "__main__":
    run_stage(main)
