"""What train.py and sample.py run on: everything around the model, nothing of it.

Settings and the command line (settings, cli), data and tokenizers (data, tokenizer), checkpoints
(checkpoint), many GPUs (distributed), will-it-fit and the plan (memory, plan), metrics plots (plot).
Each imports the model from the package top; the model imports nothing from here.
"""
