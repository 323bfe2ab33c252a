"""
COCO 2014 captions with the Karpathy split, in nanoblip2's annotation format (see nanoblip2/data.py).

    python data/coco/prepare.py                          # download images (~19 GB) + split, then convert
    python data/coco/prepare.py --download=false --karpathy=path/to/dataset_coco.json --images=/datasets/coco

Writes <out>/train.json (Karpathy train + restval, as LAVIS and Karpathy train on both: 113,287 images, 566,747
captions), val.json and test.json (5,000 images each). Each is a JSON list, one entry per image and per line:
    {"image": "train2014/COCO_train2014_000000000009.jpg", "caption": ["raw sentence", ...], "image_id": 9}
"image" is relative to --images, which holds (or will hold) train2014/ and val2014/. Captions are kept raw;
CaptionDataset cleans them with pre_caption. Training expands each image into one sample per caption.

The only code that touches the network: downloads go to a .part file that is renamed when complete, the zips
are unpacked and then deleted, and whatever is already there is not fetched again. With --download=false it
only converts a local dataset_coco.json, and reports how many of its images are missing.
"""
import json
import os
import shutil
import sys
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere, nanoGPT style, no install
from nanoblip2.cli import parse_args  # noqa: E402

KARPATHY_URL = "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"
IMAGES_URL = "http://images.cocodataset.org/zips/{}.zip"  # train2014 (13 GB), val2014 (6 GB)
SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}  # Karpathy split -> our file


@dataclass
class PrepareConfig:
    out: str = "data/coco"  # where train.json, val.json, test.json go
    karpathy: str = ""      # a local dataset_coco.json; "" = <out>/dataset_coco.json, downloaded if missing
    images: str = ""        # the folder with train2014/ and val2014/; "" = <out>/images
    download: bool = True   # fetch what is missing (images, Karpathy split); false = convert only


def download(url, dest):
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f, tqdm(
                total=int(r.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                unit_divisor=1024, desc=dest.name) as bar:
            while chunk := r.read(1 << 20):
                bar.update(f.write(chunk))
    except OSError as e:  # URLError, timeouts, disk full
        sys.exit(f"error: downloading {url} failed ({e}); offline, use --download=false --karpathy=<file>")
    os.replace(tmp, dest)


def unzip(zip_path, dest):
    with zipfile.ZipFile(zip_path) as z:
        for member in tqdm(z.infolist(), desc=f"unzip {zip_path.name}", unit="file"):
            z.extract(member, dest)


def write_json_list(entries, path):
    """One entry per line, written to a temporary file and renamed."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("[\n" + ",\n".join(json.dumps(e, ensure_ascii=False) for e in entries) + "\n]\n", encoding="utf-8")
    os.replace(tmp, path)


cfg = parse_args(PrepareConfig(), doc=__doc__)
out = Path(cfg.out)
images = Path(cfg.images) if cfg.images else out / "images"
karpathy = Path(cfg.karpathy) if cfg.karpathy else out / "dataset_coco.json"
if cfg.karpathy and not karpathy.is_file():  # before any download, not after 19 GB of it
    sys.exit(f"error: {karpathy}: no such file (--karpathy)")
out.mkdir(parents=True, exist_ok=True)

# -----------------------------------------------------------------------------
# download what is missing

if cfg.download and not cfg.karpathy and not karpathy.is_file():
    zip_path = out / "raw" / "caption_datasets.zip"
    if not zip_path.is_file():
        download(KARPATHY_URL, zip_path)
    with zipfile.ZipFile(zip_path) as z:  # holds dataset_{coco,flickr8k,flickr30k}.json
        name = next(n for n in z.namelist() if n.endswith("dataset_coco.json"))
        karpathy.with_name(karpathy.name + ".tmp").write_bytes(z.read(name))
    os.replace(karpathy.with_name(karpathy.name + ".tmp"), karpathy)
if cfg.download:
    for split in ("train2014", "val2014"):
        if (images / split).is_dir():
            continue
        zip_path = out / "raw" / f"{split}.zip"
        if not zip_path.is_file():
            download(IMAGES_URL.format(split), zip_path)
        tmp = images / f".{split}.tmp"  # unzip aside, then rename: a half-unzipped folder never looks done
        shutil.rmtree(tmp, ignore_errors=True)
        unzip(zip_path, tmp)
        os.replace(tmp / split, images / split)
        shutil.rmtree(tmp)
        zip_path.unlink()

# -----------------------------------------------------------------------------
# convert the Karpathy split

if not karpathy.is_file():
    sys.exit(f"error: {karpathy}: no such file; pass --karpathy=<path to dataset_coco.json>, or --download=true")
data = json.loads(karpathy.read_text(encoding="utf-8"))
splits = {"train": [], "val": [], "test": []}
for img in tqdm(data["images"], desc="convert", unit="image"):
    if img["split"] not in SPLITS:
        sys.exit(f"error: {karpathy}: image {img['cocoid']} has unknown split {img['split']!r}")
    splits[SPLITS[img["split"]]].append({"image": f"{img['filepath']}/{img['filename']}",
                                         "caption": [s["raw"] for s in img["sentences"]],
                                         "image_id": img["cocoid"]})
for split, entries in splits.items():
    write_json_list(entries, out / f"{split}.json")
    n_captions = sum(len(e["caption"]) for e in entries)
    print(f"{split}: {len(entries):,} images, {n_captions:,} captions -> {out / split}.json")

everything = [e["image"] for entries in splits.values() for e in entries]
missing = [p for p in everything if not (images / p).is_file()]
if missing:
    print(f"warning: {len(missing):,} of {len(everything):,} images are missing under {images}, e.g. {missing[0]}"
          f" (get them with --download=true, or point --images at them)")
else:
    print(f"images: all {len(everything):,} found under {images}")
