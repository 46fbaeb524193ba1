"""The arena: people (and judges) compare two anonymous answers; votes become ratings and
preference pairs.

records.py (what every part shares), bradley_terry.py and ratings.py (ratings with bootstrap
intervals), agreement.py (people vs judges), battles.py (battle logs in, preference pairs
out), report.py (ratings.json and the page); the store, the page and the commands build on
these."""
