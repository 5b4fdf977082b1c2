"""``qcall phone``: the full-screen terminal phone (docs/phone.md).

* :mod:`qcall.phone.model` — pure: contacts rows, verification rules, panels, meters;
* :mod:`qcall.phone.history` — recent and missed calls (``calls.json`` in the home);
* :mod:`qcall.phone.audio` — mute, hold, volume, level meters, ringtone and ringback;
* :mod:`qcall.phone.conversations` — the messages screen's model over ``MessagingClient``;
* :mod:`qcall.phone.controller` — the asyncio shell around :class:`~qcall.call.phone.Phone`;
* :mod:`qcall.phone.app`, :mod:`qcall.phone.screens` — the Textual app that renders it.
"""
