"""What an archive holds and where: storage (local or s3://), the catalog of its images, a synthetic sample."""
