"""The command line: argument parsing and commands only (no training or model code lives here).

    main.py     the entry point: one parser, the list of command modules, errors -> exit codes
    train.py    adapterkit train lora|controlnet|pretrain CONFIG [key=value ...]
    lora.py     adapterkit merge | convert | extract | resize | inspect
    sample.py   adapterkit sample
    quality.py  adapterkit quality

The entry point is `adapterkit.train.cli.main:main` (the `adapterkit` script and `python -m adapterkit`).
"""
