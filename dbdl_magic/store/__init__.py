"""The model store: the registry of models and checkpoints, content-addressed weight blocks,
model modules (spec ⇄ ``nn.Module``) and approximate deduplication.
"""
