"""chatsmith: build, own and serve your own ChatGPT."""

__version__ = "0.1.0"
