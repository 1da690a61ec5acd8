"""Fleet distribution: signed bundles published as OCI artifacts, release metadata kept with TUF
(python-tuf), and a device agent that verifies, installs atomically and rolls back."""
