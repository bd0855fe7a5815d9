"""The offline reference agent: a Realtime-subset server with local speech recognition and speech."""
