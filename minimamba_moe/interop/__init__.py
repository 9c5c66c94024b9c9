"""What talks to other projects' formats and tools.

convert: Zyphra's released BlackMamba weights (``pytorch_model.bin`` + ``config.json``) into this
project's model and checkpoint; sample.py's ``--zyphra`` uses it. Imports the model and run/, never
the other way.
"""
