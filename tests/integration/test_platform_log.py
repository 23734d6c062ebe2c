"""The platform log (system policy, catalog prices) is audited like a project and readable by platform admins."""

from tests.factories import register


async def test_platform_admin_reads_and_verifies_the_platform_log(client):
    admin = await register(client, email="admin@smartspace.test")
    resp = await client.put("/api/v1/admin/policy", json={"max_per_request_micros": 50_000_000},
                            headers=admin.headers)
    assert resp.status == 200, await resp.text()

    log = await client.get("/api/v1/projects/platform/audit?type=policy.*", headers=admin.headers)
    assert log.status == 200
    items = (await log.json())["items"]
    assert items and items[0]["type"] == "policy.updated"
    assert items[0]["actor"] == f"user:{admin.id}"

    verify = await (await client.get("/api/v1/projects/platform/audit/verify", headers=admin.headers)).json()
    assert verify["ok"] is True and verify["checked"] >= 1


async def test_other_users_cannot_see_the_platform_log(client):
    user = await register(client)
    resp = await client.get("/api/v1/projects/platform/audit", headers=user.headers)
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "not_found"
