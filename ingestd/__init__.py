"""ingestd: moves large files from an NFS share into Azure Blob Storage.

The parent process serves the HTTP API and supervises child processes that
do every file and network operation (see ``supervisor``).
"""

__version__ = "0.1.0"
