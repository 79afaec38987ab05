"""The five steps. Each is a plain typed function over files, importable without kfp or hera."""
