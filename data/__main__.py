"""Prepare a corpus: documents, train/val split, SentencePiece tokenizer, packed token files and a manifest,
cached by content hash (data/prepare.py).

    python -m data                      # the default corpus: prepare and print its statistics
    python -m data --corpus my_texts/ --file-glob '**/*.txt' --vocab-size 8000
"""

from common.cli import run_main
from data.prepare import main

if __name__ == "__main__":
    run_main(main)
