"""The arena: people (and judges) compare two anonymous answers; votes become ratings and
preference pairs (records.py, store.py, ratings.py, battles.py)."""
