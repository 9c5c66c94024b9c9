"""What talks to other projects' formats and tools.

    convert      Zyphra's released BlackMamba weights (pytorch_model.bin + config.json) into this
                 project's model and checkpoint (sample.py --zyphra)
    hub          the same weights by hub id (Zyphra/BlackMamba-1.5B), fetched by huggingface_hub
    harness      the `minimamba` model of EleutherAI's lm-evaluation-harness, and its command
    perplexity   loss, perplexity and bits per byte of a model on any local text

Each imports the model and run/; neither imports anything from here.
"""
