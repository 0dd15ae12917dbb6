"""``python -m sleepzoo ...``: the sleepzoo command line, also as torchrun starts it.

    torchrun --nproc_per_node=2 -m sleepzoo train recipes/rule110-tiny.yaml --out runs/tiny-ddp
"""

from .cli import main

if __name__ == "__main__":
    main(prog_name="sleepzoo")
