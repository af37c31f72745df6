"""Run the XTC pipeline: python train.py task=sst2 quant=binary (see conf/config.yaml)."""

from xtc_lightning.cli import main

if __name__ == "__main__":
    main()
