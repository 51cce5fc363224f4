"""Data preparation without torch: source access (local files, the Hugging Face hub, official
archives), source identities, paper A tokenisation, byte streams, SVA, Speech Commands listing.

The tasks in `workers/tasks/` call these to build the Arrow tables that `storage.cache` stores.
"""
