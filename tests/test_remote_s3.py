"""s3:// against moto's S3 server on 127.0.0.1 (real S3 semantics: path
style, ListObjectsV2, SigV4 headers, ETags, If-Match), environment and
storage_options settings, and the SigV4 signer against botocore's."""

from __future__ import annotations

import datetime
import hashlib
from pathlib import Path

import numpy as np
import pytest
from conftest import RULES, differing, expected_shards, write_matrix

import gpuload
from gpuload import synth
from gpuload.errors import ReadError

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

pytestmark = pytest.mark.timeout(180)
KEYS = {"access_key_id": "testing", "secret_access_key": "testing-secret"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=KEYS["access_key_id"],
        aws_secret_access_key=KEYS["secret_access_key"],
    )
    client.create_bucket(Bucket="models")
    root = tmp_path_factory.mktemp("s3")
    (root / "matrix").mkdir()
    matrix = write_matrix(
        root / "matrix",
        np.random.default_rng(3),
        index=True,
        extra={"big.row": ("F32", (24, 65536))},
    )
    moe = synth.write_model(root / "moe", "tiny-qwen-moe", num_files=2)
    for d, prefix in ((matrix, "matrix/"), (moe, "deep/moe/")):
        for p in Path(d).iterdir():
            client.upload_file(str(p), "models", prefix + p.name)
    yield endpoint, client, matrix, moe
    server.stop()


def _opts(endpoint: str) -> dict:
    return {"endpoint": endpoint, "allow_http": True, **KEYS}


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_s3_prefix_every_rank_matches_oracle(s3, world):
    endpoint, _, matrix, _ = s3
    for rank in range(world):
        got, rep = gpuload.load_sharded(
            "s3://models/matrix/",
            rank,
            world,
            device="cpu",
            rules=RULES,
            storage_options=_opts(endpoint),
            return_report=True,
        )
        assert not differing(got, expected_shards(matrix, rank, world, {"big.row": 0}))
        assert rep.bytes_read > 0 and rep.backend == "remote"


def test_s3_moe_from_environment(s3, monkeypatch):
    endpoint, _, _, moe = s3
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEYS["access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", KEYS["secret_access_key"])
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ALLOW_HTTP", "true")
    for world in (2, 8):
        for rank in range(world):
            got = gpuload.load_sharded("s3://models/deep/moe", rank, world, device="cpu")
            want = gpuload.load_sharded(moe, rank, world, device="cpu")
            assert set(got) == set(want)
            assert all(got[n].tobytes() == want[n].tobytes() for n in want)
    # one key, and a plan without any tensor read
    one = sorted(p.name for p in Path(moe).glob("*.safetensors"))[0]
    got = gpuload.load_sharded(f"s3://models/deep/moe/{one}", 0, 1, device="cpu")
    assert got and all(
        got[n].tobytes() == v.tobytes()
        for n, v in gpuload.load_sharded(Path(moe) / one, 0, 1, device="cpu").items()
    )
    with gpuload.Loader(device="cpu") as ld:
        lp = ld.plan("s3://models/deep/moe/", 1, 2)
        assert lp.plan.bytes_read > 0


def test_s3_plain_http_needs_allow_http(s3):
    endpoint = s3[0]
    with pytest.raises(ValueError, match="AWS_ALLOW_HTTP"):
        gpuload.load_sharded(
            "s3://models/matrix/", 0, 1, device="cpu", storage_options={"endpoint": endpoint}
        )


def test_s3_missing_bucket_and_key(s3):
    endpoint = s3[0]
    with pytest.raises((FileNotFoundError, ReadError), match="nobucket"):
        gpuload.load_sharded(
            "s3://nobucket/x/", 0, 1, device="cpu", storage_options=_opts(endpoint)
        )
    with pytest.raises(ReadError, match=r"s3://|HTTP 404") as e:
        gpuload.load_sharded(
            "s3://models/matrix/nope.safetensors",
            0,
            1,
            device="cpu",
            storage_options=_opts(endpoint),
        )
    assert "testing-secret" not in str(e.value)


def test_sigv4_matches_botocore():
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials as BotoCreds

    from gpuload.read.remote.s3 import Bucket, Credentials, sign

    creds = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG", "tok/en+=", "eu-west-3")
    t = Bucket("my-bucket", "http://127.0.0.1:9000", creds).target(
        "dir/a b+c.safetensors", {"list-type": "2", "prefix": "dir/"}
    )
    req = AWSRequest(method="GET", url=t.url, headers={})
    auth = S3SigV4Auth(
        BotoCreds("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG", "tok/en+="), "s3", "eu-west-3"
    )
    req.headers["X-Amz-Content-SHA256"] = hashlib.sha256(b"").hexdigest()
    auth.add_auth(req)  # stamps the time itself: sign ours at that time
    stamp = req.context["timestamp"]
    now = datetime.datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.timezone.utc)
    ours: dict[str, str] = {}
    sign(creds, "GET", t, ours, now=now)
    assert ours["x-amz-date"] == req.headers["X-Amz-Date"]
    assert ours["Authorization"] == req.headers["Authorization"]
