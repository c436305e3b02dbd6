"""The serving ceiling for bench/serve_load.py: a Starlette app answering /v1/recommend with a constant JSON body."""
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

BODY = (b'{"user":1,"items":' + b"[" + b",".join(b'{"item":%d,"score":0.5}' % i for i in range(10)) + b"]"
        b',"source":"history","timings_ms":{}}')


async def recommend(request):
    await request.body()
    return Response(BODY, media_type="application/json")


app = Starlette(routes=[Route("/v1/recommend", recommend, methods=["POST"]),
                        Route("/readyz", recommend, methods=["GET"])])
