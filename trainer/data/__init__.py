"""Datasets: multidatabackend parsing (backends), image discovery and captions (discovery), bucket and
crop plans (buckets, transforms), dataset sizing (sizing), the training sampler (sampler), demo data."""
