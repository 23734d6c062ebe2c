from tests.factories import register


async def test_register_creates_a_default_project_and_logs_it(client):
    alice = await register(client)
    resp = await client.get(f"/api/v1/projects/{alice.project_id}/audit", headers=alice.headers)
    assert resp.status == 200
    body = await resp.json()
    assert [e["type"] for e in body["items"]] == ["project.created"]
    verify = await (await client.get(f"/api/v1/projects/{alice.project_id}/audit/verify",
                                     headers=alice.headers)).json()
    assert verify == {"ok": True, "checked": 1, "first_bad_seq": None}
