"""Write the contacts task's data: train/valid chat rows, train/valid preference pairs, and
held-out rows phrased unlike the training rows (``ftengine_contacts.heldout``).

python examples/contacts/generate.py --out examples/contacts/data --train 2000 --valid 200 --prefs 600 --heldout 100 --seed 0
"""

import argparse

from ftengine_contacts.heldout import write_heldout
from ftengine_contacts.task import write_splits


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory to write the five JSONL files into")
    parser.add_argument("--train", type=int, default=2000, help="training chat rows")
    parser.add_argument("--valid", type=int, default=200, help="validation chat rows")
    parser.add_argument("--prefs", type=int, default=600, help="training preference pairs")
    parser.add_argument("--prefs-valid", type=int, default=100, help="validation preference pairs")
    parser.add_argument("--heldout", type=int, default=100, help="held-out-phrasing chat rows")
    parser.add_argument("--seed", type=int, default=0, help="the same seed writes the same files")
    args = parser.parse_args(argv)
    paths = write_splits(
        args.out,
        n_train=args.train,
        n_valid=args.valid,
        n_prefs=args.prefs,
        n_prefs_valid=args.prefs_valid,
        seed=args.seed,
    )
    paths["heldout"] = write_heldout(args.out, n=args.heldout, seed=args.seed)
    for split, path in paths.items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
