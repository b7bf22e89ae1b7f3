"""End-to-end smoke: a purchase through the real gateway to the SME stand-in."""

import jwt

from .conftest import BRIDGE_SECRET


async def test_purchase_reaches_sme_with_bridge_token(gateway, bearer):
    """A purchase with a valid owner session is forwarded once, as superadmin, and answered 200."""
    gw = await gateway()
    status, headers, body = await gw.request(
        "POST",
        "/api/v1/billing/purchase?x=1",
        headers={**bearer(), "Content-Type": "application/json"},
        data=b'{"sku": "starter"}',
    )
    assert status == 200, body
    assert b"order_id" in body
    assert len(gw.sme.received) == 1
    seen = gw.sme.received[0]
    assert (seen.method, seen.path, seen.query) == ("POST", "/api/billing/purchase", "x=1")
    claims = jwt.decode(
        seen.headers["Authorization"].split()[1], BRIDGE_SECRET, algorithms=["HS256"]
    )
    assert claims["role"] == "superadmin"
    assert headers["X-Request-ID"]
