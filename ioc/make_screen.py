"""Write ioc/bcdi.bob, the Phoebus operator screen (run: python ioc/make_screen.py).

Status and message, latencies, chi with its trend, the live ES cost, the recommendations and
the six slice images. PV names use the macro $(P) (default BCDI:).
"""

from __future__ import annotations

from pathlib import Path
from xml.sax.saxutils import escape

from caproto import ChannelType

from bcdi_bluesky.epics.ioc import IMAGE_SIZE, ReconstructionIOC
from bcdi_bluesky.files import atomic_write_bytes

HERE = Path(__file__).resolve().parent


def _widget(kind: str, name: str, x: int, y: int, w: int, h: int, **props: str) -> str:
    body = "".join(f"<{k}>{v}</{k}>" for k, v in props.items())
    return (
        f'<widget type="{kind}" version="2.0.0"><name>{escape(name)}</name><x>{x}</x>'
        f"<y>{y}</y><width>{w}</width><height>{h}</height>{body}</widget>"
    )


def _label(text: str, x: int, y: int, w: int = 140) -> str:
    return _widget("label", f"label {text}", x, y, w, 20, text=escape(text))


def _value(pv: str, x: int, y: int, w: int = 120, long_string: bool = False) -> str:
    # Format 6 (string) shows a long string's CHAR waveform as text, not as numbers.
    props = {"format": "6"} if long_string else {}
    return _widget("textupdate", pv, x, y, w, 20, pv_name=f"$(P){pv}", **props)


def _long_strings() -> set[str]:
    """The IOC's long-string PVs (its CHAR waveforms), shown wide and as text."""
    group = ReconstructionIOC(prefix="")
    return {name for name, pv in group.pvdb.items() if pv.data_type == ChannelType.CHAR}


def screen() -> str:
    """The .bob XML."""
    long_strings = _long_strings()
    parts = [_label("BCDI reconstruction", 10, 10, 300)]
    y = 40
    for pv in (
        "Status",
        "StatusMsg",
        "Quality",
        "Quality:Reasons",
        "ScanID",
        "ScanUID",
        "Count",
        "Heartbeat",
        "Enable",
        "Model:Name",
        "Model:Provider",
    ):
        wide = pv in long_strings
        parts += [_label(pv, 10, y), _value(pv, 150, y, 360 if wide else 160, wide)]
        y += 24
    y += 8
    for pv in (
        "Chi",
        "ChiCNN",
        "Phase:RMS",
        "Volume",
        "ES:Iteration",
        "ES:Cost",
        "Latency:Preprocess",
        "Latency:Inference",
        "Latency:Refine",
        "Latency:Polish",
        "Latency:Total",
        "Rec:ThetaCenter",
        "Rec:ThetaRange",
        "Rec:Exposure",
    ):
        parts += [_label(pv, 10, y), _value(pv, 150, y)]
        y += 24
    trend = (
        '<widget type="stripchart" version="2.1.0"><name>chi trend</name><x>540</x>'
        "<y>40</y><width>520</width><height>220</height><title>chi per scan</title>"
        "<y_axes><y_axis><title>chi</title><autoscale>true</autoscale></y_axis></y_axes>"
        "<traces><trace><name>chi</name><y_pv>$(P)Chi</y_pv><axis>0</axis></trace>"
        "<trace><name>CNN chi</name><y_pv>$(P)ChiCNN</y_pv><axis>0</axis></trace>"
        "</traces></widget>"
    )
    cost = (
        '<widget type="xyplot" version="2.0.0"><name>ES cost</name><x>540</x><y>270</y>'
        "<width>520</width><height>200</height><title>ES cost per step</title>"
        "<traces><trace><name>ES cost</name><x_pv></x_pv><y_pv>$(P)ES:CostHistory</y_pv>"
        "</trace></traces></widget>"
    )
    parts += [trend, cost]
    images_top = y + 16  # below the lists of values
    for col, plane in enumerate(("XY", "XZ", "YZ")):
        for row, kind in enumerate(("Amp", "Phase")):
            x, top = 10 + col * 350, images_top + row * 360
            parts.append(_label(f"{kind} {plane}", x, top, 200))
            parts.append(
                _widget(
                    "image",
                    f"{kind}:{plane}",
                    x,
                    top + 22,
                    330,
                    330,
                    pv_name=f"$(P){kind}:{plane}",
                    # Phoebus takes the image size as numbers: the IOC's Image:Width/Height.
                    data_width=str(IMAGE_SIZE),
                    data_height=str(IMAGE_SIZE),
                    color_map=f"<name>{'GRAY' if kind == 'Amp' else 'JET'}</name>",
                    autoscale="true",
                )
            )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<display version="2.0.0">'
        f"<name>bcdi-bluesky</name><width>1080</width><height>{images_top + 740}</height>"
        "<macros><P>BCDI:</P></macros>" + "".join(parts) + "</display>\n"
    )


if __name__ == "__main__":
    atomic_write_bytes(HERE / "bcdi.bob", screen().encode())
    print(HERE / "bcdi.bob")
