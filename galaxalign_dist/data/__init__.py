"""Data preparation and formats: sources -> Parquet shards, Galaxy Zoo DESI, symbols, transforms, readers."""
