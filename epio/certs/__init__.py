"""TLS certificates for apps' custom domains: ACME issuance, owners' certificates,
and their delivery to every router (docs/https.md)."""
