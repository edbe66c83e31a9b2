"""etcd TLS and authentication, pure logic: settings validation, the token keeper,
error answers sorted into renew / refuse / retry, and a call's single retry after
renewing a token (the gateway's transport faked; real etcd: the integration test
tests/integration/test_etcd_security.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pgroute.cluster.etcd_auth import EtcdAuthError, EtcdSecurity, TokenKeeper
from pgroute.cluster.etcd_gateway import Answer, EndpointFailed, EtcdError, EtcdGateway, raise_for_error

SECRET = "hunter2-secret"


def test_security_settings_validate_and_hide_the_password():
    with pytest.raises(ValueError, match="etcd_key is set without etcd_cert"):
        EtcdSecurity(key="/k.pem")
    with pytest.raises(ValueError, match="etcd_password is set without etcd_user"):
        EtcdSecurity(password=SECRET)
    with pytest.raises(ValueError, match="etcd_user is set without etcd_password"):
        EtcdSecurity(user="root")
    security = EtcdSecurity(cert="/c.pem", user="root", password=SECRET)  # key inside the cert file
    assert security.authenticates and SECRET not in repr(security)
    assert not EtcdSecurity().authenticates
    assert SECRET not in repr(TokenKeeper("root", SECRET))


async def test_one_authentication_for_concurrent_renewals_of_the_same_token():
    sent: list[dict[str, Any]] = []

    async def authenticate(body: dict[str, Any]) -> dict[str, Any]:
        sent.append(body)
        await asyncio.sleep(0.01)
        return {"token": f"t{len(sent)}"}

    keeper = TokenKeeper("root", SECRET)
    assert keeper.headers() == {}
    await asyncio.gather(keeper.ensure(authenticate), keeper.ensure(authenticate))
    assert sent == [{"name": "root", "password": SECRET}]
    assert keeper.headers() == {"Authorization": "t1"}
    await asyncio.gather(keeper.renew("t1", authenticate), keeper.renew("t1", authenticate))
    assert keeper.token == "t2" and keeper.renewals == 1 and len(sent) == 2


async def test_an_answer_without_a_token_is_an_auth_error():
    async def authenticate(body: dict[str, Any]) -> dict[str, Any]:
        return {"header": {}}

    with pytest.raises(EtcdAuthError, match="gave no token"):
        await TokenKeeper("root", SECRET).ensure(authenticate)


@pytest.mark.parametrize(
    "answer, raised, text",
    [
        ({"code": 16, "message": "etcdserver: invalid auth token"}, EtcdError, "invalid auth token"),
        (
            {"code": 3, "message": "etcdserver: authentication failed, invalid user ID or password"},
            EtcdAuthError,
            "etcd_password",
        ),
        ({"code": 3, "message": "etcdserver: user name is empty"}, EtcdAuthError, "set [cluster] etcd_user"),
        ({"code": 7, "message": "etcdserver: permission denied"}, EtcdAuthError, "lacks the rights"),
        ({"code": 9, "message": "etcdserver: authentication is not enabled"}, EtcdAuthError, "remove [cluster]"),
        ({"code": 14, "message": "etcdserver: no leader"}, EndpointFailed, "no leader"),
        ({"code": 5, "message": "etcdserver: requested lease not found"}, EtcdError, "lease not found"),
    ],
)
def test_error_answers_are_sorted(answer, raised, text):
    with pytest.raises(raised) as caught:
        raise_for_error(answer, 400, "root")
    assert text in str(caught.value)
    assert type(caught.value) is raised


class ScriptedGateway(EtcdGateway):
    """The transport replaced by a script: rpc -> answers (an exception is raised)."""

    def __init__(self, script: dict[str, list[Any]]) -> None:
        super().__init__(["127.0.0.1:1"], 1.0, EtcdSecurity(user="root", password=SECRET))
        self.script = script
        self.sent: list[tuple[str, str | None]] = []

    async def _call(self, rpc, body, deadline, total, *, auth=True) -> Answer:
        assert self.auth is not None
        self.sent.append((rpc, self.auth.token if auth else None))
        outcome = self.script[rpc].pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return Answer(outcome, 0.0, "127.0.0.1:1")


EXPIRED = EtcdError(16, "etcdserver: invalid auth token")


async def test_a_call_renews_an_expired_token_and_is_sent_once_more():
    gateway = ScriptedGateway(
        {
            "auth/authenticate": [{"token": "t1"}, {"token": "t2"}],
            "kv/range": [EXPIRED, {"kvs": []}],
        }
    )
    answer = await gateway.call("kv/range", {})
    assert answer.body == {"kvs": []}
    assert gateway.sent == [
        ("auth/authenticate", None),
        ("kv/range", "t1"),
        ("auth/authenticate", None),
        ("kv/range", "t2"),
    ]


async def test_a_token_refused_twice_in_a_row_is_not_retried_again():
    gateway = ScriptedGateway(
        {
            "auth/authenticate": [{"token": "t1"}, {"token": "t2"}],
            "kv/range": [EXPIRED, EXPIRED, {"kvs": []}],
        }
    )
    with pytest.raises(EtcdError, match="invalid auth token"):
        await gateway.call("kv/range", {})
    assert len(gateway.sent) == 4


async def test_a_refused_password_is_an_auth_error_without_the_password():
    refused = EtcdAuthError("etcd: etcdserver: authentication failed, invalid user ID or password (code 3)")
    gateway = ScriptedGateway({"auth/authenticate": [refused]})
    with pytest.raises(EtcdAuthError) as caught:
        await gateway.call("kv/range", {})
    assert SECRET not in str(caught.value)
    assert gateway.sent == [("auth/authenticate", None)]
