"""ec2-metadata, which knows IMDS at 169.254.169.254 only: the role's access key id and the
instance id. (argv[1], the STS endpoint, is not used: this client signs nothing.)"""

from __future__ import annotations

from importlib.metadata import version

from ec2_metadata import ec2_metadata
from report import run


def metadata() -> dict[str, object]:
    credentials = ec2_metadata.iam_security_credentials
    if credentials is None:
        raise LookupError("no instance profile")
    return {"access_key": credentials["AccessKeyId"], "instance_id": ec2_metadata.instance_id}


if __name__ == "__main__":
    run(version("ec2-metadata"), metadata)
