"""`weightsmith ui`: a local web app over a workspace: store, runs, reports, lineage, arena, chat.

See app.py for the routes and the rules; pages.py for the HTML; workspace.py for what is read;
auth.py for the key and CSRF; chat.py (only with --allow-run) and leaderboard.py.
"""
