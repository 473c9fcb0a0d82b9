"""Images, transforms, datasets and masking."""
