"""The raw folder's layout: what the download stage writes and preprocess reads.

``data/raw`` holds ``source.json`` (what was fetched, from where, and the layout) and one
of three layouts:

    pool/             one image set (classifier/data/dataset.py), split later: digits
    train/, test/     image sets keeping the source's own test split: mnist, fashion_mnist, idx_dir
    files/<class>/    image files as they were, one folder per class: folder, archive
"""

SOURCE_FILE = "source.json"
FILES_DIR = "files"
POOL_DIR = "pool"
# Values of source.json's "layout".
POOL_LAYOUT = "pool"
SPLIT_LAYOUT = "split"
FILES_LAYOUT = "files"
