"""Evaluation and search: loading an export, embeddings, heads and metrics, figures, FAISS index."""
