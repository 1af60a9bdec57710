"""tokenbridge."""
