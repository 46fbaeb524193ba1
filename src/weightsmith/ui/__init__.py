"""`weightsmith ui`: a local, read-only web app over a workspace: store, runs, reports, lineage.

See app.py for the routes and the rules; pages.py for the HTML; workspace.py for what is read.
"""
