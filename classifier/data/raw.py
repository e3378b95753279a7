"""The raw folder's layout: what the download stage writes and preprocess reads.

``data/raw`` holds ``source.json`` (what was fetched, from where, and the layout) and one
of four layouts:

    pool/             one image set (classifier/data/dataset.py), split later: digits
    train/, test/     image sets keeping the source's own test split: mnist, fashion_mnist, idx_dir
    files/<class>/    image files as they were, one folder per class: folder, archive, csv
    files/<split>/<class>/
                      the same under train/, test/ and maybe val/: a folder or archive that
                      comes split, whose test split (and validation split) is kept
"""

SOURCE_FILE = "source.json"
FILES_DIR = "files"
POOL_DIR = "pool"
# Values of source.json's "layout".
POOL_LAYOUT = "pool"
SPLIT_LAYOUT = "split"
FILES_LAYOUT = "files"
SPLIT_FILES_LAYOUT = "split_files"
