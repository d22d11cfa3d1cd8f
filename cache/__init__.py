"""The data path: block cache, write-back uploader and journal (import cloudfs.cache)."""
