"""Benchmark: ingestd against rclone and the raw azure-storage-blob SDK.

Run ``.venv/bin/python -m bench`` (see ``bench/RESULTS.md`` and the README).
Everything runs on this machine against one in-memory Azurite on loopback.
"""
