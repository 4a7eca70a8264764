"""A local web page over a small JSON API: type a prompt, see its memorization score and token significance,
and generate its images again with a mitigation."""
