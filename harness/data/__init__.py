"""Token data: the GPT-2 tokenizer from local files, uint16 shards with a manifest, and the
embedded smoke corpus built from the Python standard library's own documentation."""
